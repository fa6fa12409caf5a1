-- Neurons ranked by how many outlier shifts (TopK rows) moved them, then by their total |shift|.
-- param kind = 'output'  'output': weight rows (output neurons); 'input': columns (input features)
-- param param = '*'      GLOB over weight tensor names, e.g. '*mlp*'
-- param n = 20           rows to return
SELECT neuron, param, kind, neuron_index, shifts, mass, net_shift, approx_examples,
       first_step, last_step
FROM neurons
WHERE kind = $kind AND param GLOB $param
ORDER BY shifts DESC, mass DESC, neuron
LIMIT $n
