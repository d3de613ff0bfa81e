-- How much alignment each perturbation costs: the `M_drop` rows (unperturbed minus perturbed,
-- positive = alignment lost) per perturbation and per pooled family, with the unperturbed and
-- perturbed scores of the full grid at the same layer pair where the study recorded them.
WITH drops AS (
    SELECT *, regexp_replace(metric, '_drop$', '') AS base_metric
    FROM alignment
    WHERE study = 'perturbation' AND metric LIKE '%\_drop' ESCAPE '\'
),
grid AS (
    SELECT * FROM alignment WHERE study = 'perturbation' AND metric NOT LIKE '%\_drop' ESCAPE '\'
)
SELECT d.dataset, d.vision_model, d.language_model, d.base_metric AS metric,
       d.vision_layer, d.language_layer, d.condition,
       split_part(d.condition, '/', 1) AS family,
       CASE WHEN contains(d.condition, '/') THEN split_part(d.condition, '/', 2) END
           AS perturbation,
       d.value AS drop, d.ci_low, d.ci_high, d.p_value, d.n,
       u.value AS unperturbed, p.value AS perturbed
FROM drops d
LEFT JOIN grid u
       ON u.dataset = d.dataset AND u.vision_model = d.vision_model
      AND u.language_model = d.language_model AND u.metric = d.base_metric
      AND u.condition = 'none'
      AND u.vision_layer = d.vision_layer AND u.language_layer = d.language_layer
LEFT JOIN grid p
       ON p.dataset = d.dataset AND p.vision_model = d.vision_model
      AND p.language_model = d.language_model AND p.metric = d.base_metric
      AND p.condition = d.condition
      AND p.vision_layer = d.vision_layer AND p.language_layer = d.language_layer
ORDER BY d.dataset, d.vision_model, d.language_model, d.base_metric,
         contains(d.condition, '/'), d.condition;
