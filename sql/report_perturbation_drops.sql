-- How much alignment each perturbation costs: the `M_drop` rows (unperturbed minus perturbed,
-- positive = alignment lost) per perturbation and per pooled family, with the unperturbed and
-- perturbed scores of the full grid at the same layer pair where the study recorded them.
-- `perturbation` is null on a family's pooled row; `metric` is the metric dropped (`drop_of`).
WITH drops AS (
    SELECT * FROM alignment WHERE study = 'perturbation' AND drop_of IS NOT NULL
),
grid AS (
    SELECT * FROM alignment WHERE study = 'perturbation' AND drop_of IS NULL
)
SELECT d.dataset, d.vision_model, d.language_model, d.drop_of AS metric,
       d.vision_layer, d.language_layer, d.condition, d.perturbation_family AS family,
       d.perturbation,
       d.value AS drop, d.ci_low, d.ci_high, d.p_value, d.n,
       u.value AS unperturbed, p.value AS perturbed
FROM drops d
LEFT JOIN grid u
       ON u.dataset = d.dataset AND u.vision_model = d.vision_model
      AND u.language_model = d.language_model AND u.metric = d.drop_of
      AND u.perturbation = 'none'
      AND u.vision_layer = d.vision_layer AND u.language_layer = d.language_layer
LEFT JOIN grid p
       ON p.dataset = d.dataset AND p.vision_model = d.vision_model
      AND p.language_model = d.language_model AND p.metric = d.drop_of
      AND p.perturbation = d.perturbation
      AND p.vision_layer = d.vision_layer AND p.language_layer = d.language_layer
ORDER BY d.dataset, d.vision_model, d.language_model, d.drop_of,
         d.perturbation IS NOT NULL, family, d.perturbation;
