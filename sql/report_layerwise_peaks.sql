-- Where each layerwise grid peaks, for the report: the best finite score per model pair and
-- metric (NaN scores, e.g. of a degenerate layer, are left out; ties go to the shallower
-- pair), with its CI, null mean and p-value, and the grid's last layers on each side.
WITH grid AS (
    SELECT * FROM alignment
    WHERE study = 'layerwise' AND condition = 'none' AND value IS NOT NULL
      -- NaN test on the text form: DuckDB folds isnan(value) to false from Parquet min/max
      -- statistics, which leave NaN out
      AND NOT isnan(value::VARCHAR::DOUBLE)
),
ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY dataset, vision_model, language_model, metric
                              ORDER BY value DESC, vision_layer, language_layer) AS rank,
           max(vision_layer) OVER (PARTITION BY dataset, vision_model, language_model, metric)
               AS last_vision_layer,
           max(language_layer) OVER (PARTITION BY dataset, vision_model, language_model, metric)
               AS last_language_layer
    FROM grid
)
SELECT dataset, vision_model, language_model, metric, vision_layer, language_layer,
       last_vision_layer, last_language_layer, value, ci_low, ci_high, null_mean, p_value, n
FROM ranked
WHERE rank = 1
ORDER BY dataset, vision_model, language_model, metric;
