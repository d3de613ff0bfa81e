-- Why rows were refused: counts per dataset, modality, stage and reason.
SELECT dataset, modality, stage, reason, count(DISTINCT item_id) AS items
FROM quarantine
GROUP BY ALL
ORDER BY items DESC, ALL;
