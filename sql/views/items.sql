-- items: one row per image or text item of every dataset (image bytes left out; see has_image_bytes).
CREATE OR REPLACE VIEW items AS
SELECT * EXCLUDE (image), image IS NOT NULL AS has_image_bytes
FROM {{ source('items') }};
