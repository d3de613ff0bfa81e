-- Does alignment grow with vision depth? Per model pair and metric: the mean layerwise score
-- over the deepest third of the vision layers (all language layers) against the shallowest
-- third. A third is max(1, round(L / 3)) of the L distinct vision layers; NaN scores are left
-- out. For the verdict: the deep band's median permutation p-value and null mean (does it beat
-- chance?), both bands' mean calibrated scores (raw scores of unrelated data also rise with
-- depth, so the deep band must rise above its null by more than the shallow band does) and
-- the mean of the deep band's bootstrap interval low ends, raw and calibrated (is it above the
-- shallow band?).
WITH grid AS (
    SELECT * FROM alignment
    WHERE study = 'layerwise' AND value IS NOT NULL
      -- NaN test on the text form: DuckDB folds isnan(value) to false from Parquet min/max
      -- statistics, which leave NaN out
      AND NOT isnan(value::VARCHAR::DOUBLE)
),
layers AS (
    SELECT dataset, vision_model, language_model, metric, vision_layer,
           row_number() OVER w - 1 AS position,
           count(*) OVER (PARTITION BY dataset, vision_model, language_model, metric) AS n_layers
    FROM (SELECT DISTINCT dataset, vision_model, language_model, metric, vision_layer FROM grid)
    WINDOW w AS (PARTITION BY dataset, vision_model, language_model, metric ORDER BY vision_layer)
),
banded AS (
    SELECT g.dataset, g.vision_model, g.language_model, g.metric, g.vision_layer, g.value,
           g.ci_low, g.null_mean, g.calibrated, g.ci_low - g.null_mean AS calibrated_ci_low,
           g.p_value, l.position, l.n_layers,
           greatest(1, round(l.n_layers / 3.0))::INTEGER AS band
    FROM grid g
    JOIN layers l USING (dataset, vision_model, language_model, metric, vision_layer)
)
SELECT dataset, vision_model, language_model, metric,
       any_value(n_layers) AS vision_layers,
       any_value(band) AS band_layers,
       count(DISTINCT vision_layer) FILTER (WHERE position >= n_layers - band) AS deep_layers,
       avg(value) FILTER (WHERE position >= n_layers - band) AS deep_mean,
       avg(value) FILTER (WHERE position < band) AS shallow_mean,
       avg(ci_low) FILTER (WHERE position >= n_layers - band) AS deep_ci_low,
       avg(null_mean) FILTER (WHERE position >= n_layers - band) AS deep_null_mean,
       avg(null_mean) FILTER (WHERE position < band) AS shallow_null_mean,
       avg(calibrated) FILTER (WHERE position >= n_layers - band) AS deep_calibrated,
       avg(calibrated) FILTER (WHERE position < band) AS shallow_calibrated,
       avg(calibrated_ci_low) FILTER (WHERE position >= n_layers - band)
           AS deep_calibrated_ci_low,
       median(p_value) FILTER (WHERE position >= n_layers - band) AS deep_median_p,
       min(vision_layer) FILTER (WHERE position >= n_layers - band) AS deep_from_layer,
       max(vision_layer) FILTER (WHERE position < band) AS shallow_to_layer
FROM banded
GROUP BY ALL
ORDER BY ALL;
