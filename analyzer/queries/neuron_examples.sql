-- The training examples behind a neuron's outlier shifts, largest total |shift| first.
-- param neuron = ''  'MODULE:INDEX' (output neuron) or 'MODULE:in:INDEX' (input feature)
-- param n = 20       rows to return
SELECT example_id, count(*) AS shifts, sum(abs(shift)) AS mass, sum(shift) AS net_shift,
       count(DISTINCT step) AS steps, min(step) AS first_step, max(step) AS last_step
FROM neuron_shifts
WHERE module = split_part($neuron, ':', 1)
  AND kind = CASE WHEN $neuron LIKE '%:in:%' THEN 'input' ELSE 'output' END
  AND neuron_index = TRY_CAST(split_part($neuron, ':', -1) AS BIGINT)
GROUP BY example_id
ORDER BY mass DESC, example_id
LIMIT $n
