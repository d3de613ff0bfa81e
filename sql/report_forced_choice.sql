-- Forced choice of each model pair, per trial kind and direction, at two layer selections
-- applied alike to pretrained pairs and controls: `deepest` (the last vision layer x the last
-- language layer, fixed before looking) and `best` (the layer pair with the highest accuracy
-- for that kind and direction: chosen on the same trials, so optimistic). Accuracy with its
-- Wilson CI, chance (the binomial null's mean), the null's spread, the calibrated accuracy
-- (accuracy - chance), its z-score and the one-sided binomial p-value.
WITH fc AS (
    SELECT * FROM alignment WHERE study = 'forced_choice' AND metric = 'accuracy'
),
deepest AS (
    SELECT dataset, vision_model, language_model,
           max(vision_layer) AS vision_layer, max(language_layer) AS language_layer
    FROM fc GROUP BY ALL
),
ranked AS (
    SELECT *,
           row_number() OVER (PARTITION BY dataset, vision_model, language_model, direction,
                                           trial_kind
                              ORDER BY value DESC, vision_layer, language_layer) AS rank
    FROM fc
),
selected AS (
    SELECT 'deepest' AS selection, fc.*
    FROM fc JOIN deepest USING (dataset, vision_model, language_model, vision_layer,
                                language_layer)
    UNION ALL BY NAME
    SELECT 'best' AS selection, * EXCLUDE (rank) FROM ranked WHERE rank = 1
)
SELECT selection, dataset, vision_model, language_model, vision_layer, language_layer,
       trial_kind, direction, value AS accuracy, ci_low, ci_high,
       coalesce(null_mean, 0.5) AS chance, null_sd, calibrated, z_score, p_value, n
FROM selected
ORDER BY dataset, vision_model, language_model, selection DESC, trial_kind NULLS LAST,
         direction;
