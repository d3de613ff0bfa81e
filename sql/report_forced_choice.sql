-- Forced choice at the deepest layer pair (last vision layer x last language layer) of each
-- model pair: accuracy per direction with its Wilson CI, chance level and binomial p-value.
WITH fc AS (
    SELECT * FROM alignment WHERE study = 'forced_choice' AND metric = 'accuracy'
),
deepest AS (
    SELECT dataset, vision_model, language_model,
           max(vision_layer) AS vision_layer, max(language_layer) AS language_layer
    FROM fc GROUP BY ALL
)
SELECT dataset, vision_model, language_model, vision_layer, language_layer,
       direction, value AS accuracy, ci_low, ci_high,
       coalesce(null_mean, 0.5) AS chance, p_value, n
FROM fc JOIN deepest USING (dataset, vision_model, language_model, vision_layer, language_layer)
ORDER BY dataset, vision_model, language_model, direction;
