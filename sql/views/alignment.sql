-- alignment: the results table, one row per score (study, models, layers, metric, condition,
-- value with its bootstrap CI, the null's mean and sd, the null-calibrated score and z-score,
-- p-value, n items), and the version of the embeddings table it was computed from. `metric`
-- and `condition` are readable labels, each followed by its typed parts (each null where a row
-- has no such part): for `metric`, top_k (concept_retrieval's p@K) and drop_of (perturbation's
-- METRIC_drop: the metric dropped), null on a plain metric; for `condition`, k and
-- averaged_side (exemplar), direction and trial_kind (forced_choice), perturbation and
-- perturbation_family (perturbation), retrieval, breakdown and bin (concept_retrieval). Query
-- the parts, not the labels. calibrated = value - null_mean and z_score = calibrated / null_sd
-- (README, "The results table"): compare these across models and layers, not the raw values,
-- which rise with width, depth and n even for unrelated data.
CREATE OR REPLACE VIEW alignment AS
SELECT study, dataset, vision_model, language_model, vision_layer, language_layer, metric,
       top_k, drop_of, condition, k, averaged_side, direction, trial_kind, perturbation,
       perturbation_family, retrieval, breakdown, bin, value, ci_low, ci_high, null_mean, null_sd,
       calibrated, z_score, p_value, n, embeddings_version, run_id, created_at
FROM {{ source('alignment') }};
