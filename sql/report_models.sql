-- Every model in the alignment table, which side it is on and how many layers it has
-- (distinct layers in the results, over every study and dataset): relative depth of layer i
-- is i / (layers - 1).
SELECT model, side, count(DISTINCT layer) AS layers, max(layer) AS last_layer
FROM (
    SELECT vision_model AS model, 'vision' AS side, vision_layer AS layer FROM alignment
    UNION ALL
    SELECT language_model AS model, 'language' AS side, language_layer AS layer FROM alignment
)
GROUP BY ALL
ORDER BY side DESC, model;
