-- Each model pair's layerwise score at two layer selections, applied alike to pretrained pairs
-- and controls, for comparisons across models: `deepest` (the last vision layer x the last
-- language layer) and `best` (the layer pair whose score rises furthest above its permutation
-- null, i.e. the highest calibrated score; by raw score where a grid has no null). With the
-- calibrated score (value - null mean), its interval (the bootstrap CI minus the null mean),
-- its z-score against the null's spread, and the permutation p-value.
WITH grid AS (
    SELECT * FROM alignment
    WHERE study = 'layerwise' AND value IS NOT NULL
      -- NaN test on the text form: DuckDB folds isnan(value) to false from Parquet min/max
      -- statistics, which leave NaN out
      AND NOT isnan(value::VARCHAR::DOUBLE)
),
ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY dataset, vision_model, language_model, metric
                              ORDER BY coalesce(calibrated, value) DESC, vision_layer,
                                       language_layer) AS rank,
           max(vision_layer) OVER w AS last_vision_layer,
           max(language_layer) OVER w AS last_language_layer
    FROM grid
    WINDOW w AS (PARTITION BY dataset, vision_model, language_model, metric)
),
selected AS (
    SELECT 'best' AS selection, * FROM ranked WHERE rank = 1
    UNION ALL BY NAME
    SELECT 'deepest' AS selection, * FROM ranked
    WHERE vision_layer = last_vision_layer AND language_layer = last_language_layer
)
SELECT selection, dataset, vision_model, language_model, metric, vision_layer, language_layer,
       value, ci_low, ci_high, null_mean, null_sd, calibrated,
       ci_low - null_mean AS calibrated_ci_low, ci_high - null_mean AS calibrated_ci_high,
       z_score, p_value, n
FROM selected
ORDER BY dataset, vision_model, language_model, metric, selection DESC;
