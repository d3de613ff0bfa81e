-- trials: forced-choice trials (Pick-a-Pic): a caption, the images to choose between, the human
-- labels, and `preferred` (index into image_item_ids; null for a tie). Join items on item_id.
CREATE OR REPLACE VIEW trials AS
SELECT dataset, trial_id, caption_item_id, image_item_ids, preferred, label, preferred IS NULL AS tie,
       split, source
FROM {{ source('trials') }};
