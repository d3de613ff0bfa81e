-- manifest: one row per committed partition, the newest record of each (dataset, model, perturbation).
CREATE OR REPLACE VIEW manifest AS
SELECT * FROM {{ source('manifest') }}
QUALIFY row_number() OVER (PARTITION BY dataset, model, perturbation ORDER BY embeddings_version DESC NULLS LAST, created_at DESC) = 1;
