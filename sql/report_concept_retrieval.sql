-- Concept retrieval precision (P@1/10/100) per model pair, method (nn, csls) and breakdown
-- bin (`overall` when the row has no breakdown), with its chance level (null_mean) and whether
-- the row is at the model pair's deepest layer pair.
WITH cr AS (
    SELECT * REPLACE (coalesce(breakdown, 'overall') AS breakdown, coalesce(bin, '') AS bin)
    FROM alignment WHERE study = 'concept_retrieval'
)
SELECT dataset, vision_model, language_model, vision_layer, language_layer,
       retrieval AS method, breakdown, bin, metric, top_k AS at_k,
       value, ci_low, ci_high, null_mean AS chance, p_value, n,
       vision_layer = max(vision_layer) OVER pair
           AND language_layer = max(language_layer) OVER pair AS deepest
FROM cr
WINDOW pair AS (PARTITION BY dataset, vision_model, language_model)
ORDER BY dataset, vision_model, language_model, vision_layer, language_layer, method,
         breakdown, bin, at_k;
