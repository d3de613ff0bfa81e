-- The layerwise grids: every (vision layer, language layer) score per model pair and metric.
SELECT dataset, vision_model, language_model, metric, vision_layer, language_layer,
       value, ci_low, ci_high, null_mean, p_value, n
FROM alignment
WHERE study = 'layerwise'
ORDER BY dataset, vision_model, language_model, metric, vision_layer, language_layer;
