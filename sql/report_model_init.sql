-- How each embedded model's weights were initialised (pretrained | random), as the lake recorded
-- it when the model was embedded (the manifest's `init`), not as the catalog says today: the
-- report of a lake stays the same when catalog.yaml changes. A model recorded both ways (one
-- name for two nets, on different datasets) lists both; a model with no record has no row.
SELECT model, string_agg(DISTINCT init, ', ' ORDER BY init) AS init
FROM manifest
WHERE init IS NOT NULL
GROUP BY model
ORDER BY model;
