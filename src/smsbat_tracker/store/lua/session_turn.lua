-- A one-off caller's turn to ask the API about a message (Checks.poll): the message's gate,
-- then a rate-limit token, outside any line (take_turn, lib/turn.lua).
-- Returns {TURN_TAKEN, us until the token is due}, {TURN_RATE, us to wait} or
-- {TURN_GATE, ms until the gate opens}.
local gate = KEYS[1]               -- the message's gate
local bucket = KEYS[2]             -- the rate limit's keys (RateLimiter.keys)
local pause_key = KEYS[3]
local waiters = KEYS[4]
local waiters_back = KEYS[5]
local gate_ms = ARGV[1]            -- the minimum interval between two checks
local limit_on = ARGV[2] == '1'    -- the rate limit is on
local interval_us = ARGV[3]        -- the rate limit's arguments (RateLimiter.script_args)
local tolerance_us = ARGV[4]
local tokens = ARGV[5]
local ahead_us = ARGV[6]
local waiter = ARGV[7]
local due_us = ARGV[8]
local grace_us = ARGV[9]
local window_us = ARGV[10]
--! include lib/turn.lua
return take_turn(gate, gate_ms, limit_on, {bucket, pause_key, waiters, waiters_back}, {
  interval_us, tolerance_us, tokens, ahead_us, waiter, due_us, grace_us, window_us,
})
