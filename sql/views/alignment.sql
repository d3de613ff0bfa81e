-- alignment: the results table, one row per score (study, models, layers, metric, condition,
-- value with its bootstrap CI, permutation-null mean and p-value, n items), and the version of
-- the embeddings table it was computed from.
CREATE OR REPLACE VIEW alignment AS
SELECT study, dataset, vision_model, language_model, vision_layer, language_layer, metric,
       condition, value, ci_low, ci_high, null_mean, p_value, n, embeddings_version, run_id, created_at
FROM {{ source('alignment') }};
