-- alignment: the results table, one row per score (study, models, layers, metric, condition,
-- value with its bootstrap CI, permutation-null mean and p-value, n items), and the version of
-- the embeddings table it was computed from. `metric` and `condition` are readable labels,
-- each followed by its typed parts (each null where a row has no such part): for `metric`,
-- top_k (concept_retrieval's p@K) and drop_of (perturbation's METRIC_drop: the metric dropped),
-- null on a plain metric; for `condition`, k and averaged_side (exemplar), direction
-- (forced_choice), perturbation and perturbation_family (perturbation), retrieval, breakdown
-- and bin (concept_retrieval). Query the parts, not the labels.
CREATE OR REPLACE VIEW alignment AS
SELECT study, dataset, vision_model, language_model, vision_layer, language_layer, metric,
       top_k, drop_of, condition, k, averaged_side, direction, perturbation, perturbation_family,
       retrieval, breakdown, bin, value, ci_low, ci_high, null_mean, p_value, n,
       embeddings_version, run_id, created_at
FROM {{ source('alignment') }};
