-- Exemplar averaging at the deepest layer pair of each model pair and metric: the score
-- against k (exemplars averaged per concept) for each side averaged (image, text, both;
-- `unspecified` when a row names no side).
WITH ex AS (
    SELECT * REPLACE (coalesce(averaged_side, 'unspecified') AS averaged_side)
    FROM alignment WHERE study = 'exemplar'
),
deepest AS (
    SELECT dataset, vision_model, language_model, metric,
           max(vision_layer) AS vision_layer, max(language_layer) AS language_layer
    FROM ex GROUP BY ALL
)
SELECT dataset, vision_model, language_model, metric, vision_layer, language_layer,
       averaged_side AS side, k, value, ci_low, ci_high, null_mean, p_value, n
FROM ex JOIN deepest USING (dataset, vision_model, language_model, metric, vision_layer,
                            language_layer)
WHERE k IS NOT NULL
ORDER BY dataset, vision_model, language_model, metric, side, k;
