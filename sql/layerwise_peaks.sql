-- Where alignment peaks: for each model pair and metric, the best (vision layer, language layer)
-- with its score, CI, null mean and sd, calibrated score, z-score and p-value, and how deep the
-- peak sits (0 = first layer, 1 = last).
-- Ties go to the shallower pair. The report reads this query too.
WITH grid AS (
    SELECT * FROM alignment
    WHERE study = 'layerwise' AND value IS NOT NULL
      -- New results never hold NaN (they are refused when written); older lakes may. The test
      -- is on the text form: DuckDB folds isnan(value) to false from Parquet min/max
      -- statistics, which leave NaN out.
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
       round(vision_layer / greatest(last_vision_layer, 1), 2) AS vision_depth,
       round(language_layer / greatest(last_language_layer, 1), 2) AS language_depth,
       value, ci_low, ci_high, null_mean, null_sd, calibrated, z_score, p_value, n
FROM ranked
WHERE rank = 1
ORDER BY dataset, vision_model, language_model, metric;
