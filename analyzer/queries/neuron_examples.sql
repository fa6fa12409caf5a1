-- The training examples behind a neuron's outlier shifts, largest total |shift| first, with the
-- start of their text when the run has tokens.
-- param neuron = ''  'MODULE:INDEX' (output neuron) or 'MODULE:in:INDEX' (input feature)
-- param n = 20       rows to return
WITH top AS (
    SELECT example_id, count(*) AS shifts, sum(abs(shift)) AS mass, sum(shift) AS net_shift,
           count(DISTINCT step) AS steps, min(step) AS first_step, max(step) AS last_step
    FROM neuron_rows($neuron)
    GROUP BY example_id
    ORDER BY mass DESC, example_id
    LIMIT $n
),
text AS (
    SELECT example_id,
           left(string_agg(coalesce(t.token, CAST(t.token_id AS VARCHAR)), ' '
                           ORDER BY t.position), 60) AS text
    FROM tokens t SEMI JOIN top USING (example_id)
    GROUP BY example_id
)
SELECT top.*, text.text
FROM top LEFT JOIN text USING (example_id)
ORDER BY mass DESC, example_id
