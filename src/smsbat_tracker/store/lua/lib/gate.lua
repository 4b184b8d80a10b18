-- The gate: a message's minimum interval between two checks, one key set with a TTL. The
-- tracking's turn and a campaign batch's turn both go through it.
-- gate_left(key): ms until the gate opens again (0 when it is open).
-- take_gate(key, ms): close the gate for ms; true when this caller closed it, false when
-- it was already closed (someone checked the message within the interval).
local function gate_left(key)
  local left = redis.call('PTTL', key)
  if left > 0 then return left end
  return 0
end
local function take_gate(key, ms)
  return redis.call('SET', key, 1, 'PX', ms, 'NX') ~= false
end
