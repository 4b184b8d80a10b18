-- take_turn(gate, gate_ms, limit_on, limit_keys, limit_args): may this caller ask the API
-- about a message now? The message's gate first (someone checked it less than gate_ms
-- ago: {TURN_GATE, ms until it opens}), then, when the rate limit is on, a token
-- (none: {TURN_RATE, us to wait}); with one the gate is closed for gate_ms and the turn
-- is the caller's ({TURN_TAKEN, us until the token is due}).
-- limit_keys and limit_args: reserve's K and A (lib/reserve.lua).
--! include lib/gate.lua
--! include lib/reserve.lua
local TURN_RATE, TURN_TAKEN, TURN_GATE = 0, 1, 2
local function take_turn(gate, gate_ms, limit_on, limit_keys, limit_args)
  local left = gate_left(gate)
  if left > 0 then return {TURN_GATE, left} end
  local wait = 0
  if limit_on then
    local booked = reserve(limit_keys, limit_args)
    if booked[1] ~= 1 then return {TURN_RATE, booked[2]} end
    wait = booked[2]
  end
  take_gate(gate, gate_ms)
  return {TURN_TAKEN, wait}
end
