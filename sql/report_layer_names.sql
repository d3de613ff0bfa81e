-- The name of every layer of each embedded model, per dataset, from the manifest record of its
-- unperturbed partition: `layer` is the partition value in embeddings and alignment (the index
-- into layer_names), and its relative depth is layer / (layers - 1).
SELECT dataset, model, layers, layer, layer_name,
       round(layer / greatest(layers - 1, 1), 2) AS depth
FROM (
    SELECT dataset, model, len(layer_names) AS layers,
           unnest(range(len(layer_names))) AS layer,
           unnest(layer_names) AS layer_name
    FROM manifest
    WHERE perturbation = 'none' AND layer_names IS NOT NULL
)
ORDER BY dataset, model, layer;
