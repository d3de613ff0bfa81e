-- Where alignment peaks: for each model pair and metric, the best (vision layer, language layer)
-- with its score, CI and p-value, and how deep the peak sits (0 = first layer, 1 = last).
-- Ties go to the shallower pair.
WITH ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY dataset, vision_model, language_model, metric
                              ORDER BY value DESC, vision_layer, language_layer) AS rank,
           max(vision_layer) OVER (PARTITION BY dataset, vision_model, language_model, metric)
               AS last_vision_layer,
           max(language_layer) OVER (PARTITION BY dataset, vision_model, language_model, metric)
               AS last_language_layer
    FROM alignment
    WHERE study = 'layerwise' AND condition = 'none'
)
SELECT dataset, vision_model, language_model, metric, vision_layer, language_layer,
       round(vision_layer / greatest(last_vision_layer, 1), 2) AS vision_depth,
       round(language_layer / greatest(last_language_layer, 1), 2) AS language_depth,
       value, ci_low, ci_high, null_mean, p_value, n
FROM ranked
WHERE rank = 1
ORDER BY ALL;
