-- A campaign batch's turn (CampaignRunner's batch check): tokens for the whole batch in the
-- rate limit's line, or the batch goes back in the due set as it was; then each message's
-- gate, the per-message minimum interval shared with the tracking's turn. A message
-- checked by someone else within the interval gives its token back.
-- Returns {BOOKED, wait_us, gates}: the tokens are the batch's from wait_us on, gates[i]
-- 1 when message i's gate was taken (0: checked just now by someone else); or
-- {DEFERRED, wait_us, {}}: nothing booked, the batch's turn comes in wait_us.
local bucket = KEYS[1]             -- the rate limit's keys (RateLimiter.keys), then
local pause_key = KEYS[2]
local waiters = KEYS[3]
local waiters_back = KEYS[4]
local due_key = KEYS[5]            -- the campaign's due set
local GATES_AT = 6                 -- KEYS[GATES_AT + i - 1]: message i's gate
local limited = ARGV[1] == '1'     -- whether the rate limit is on
local gate_ms = ARGV[2]            -- the gate's interval
local interval_us = ARGV[3]        -- reserve(K, A)'s A (RateLimiter.script_args), then
local tolerance_us = ARGV[4]
local tokens = ARGV[5]
local ahead_us = ARGV[6]
local waiter = ARGV[7]
local due_us = ARGV[8]
local grace_us = ARGV[9]
local window_us = ARGV[10]
local count = tonumber(ARGV[11])   -- how many messages
local MESSAGES_AT = 12             -- ARGV[MESSAGES_AT + 2 * (i - 1)]: message i's id, then
                                   -- its due time (the score it goes back with)
local BOOKED, DEFERRED = 1, 0
--! include lib/reserve.lua
--! include lib/adjust.lua
--! include lib/gate.lua

local wait = 0
if limited then
  local turn = reserve({bucket, pause_key, waiters, waiters_back}, {
    interval_us, tolerance_us, tokens, ahead_us, waiter, due_us, grace_us, window_us,
  })
  wait = turn[2]
  if turn[1] == 0 then
    for i = 1, count do
      local at = MESSAGES_AT + 2 * (i - 1)
      redis.call('ZADD', due_key, 'XX', ARGV[at + 1], ARGV[at])
    end
    return {DEFERRED, wait, {}}
  end
end
local gates, missed = {}, 0
for i = 1, count do
  if take_gate(KEYS[GATES_AT + i - 1], gate_ms) then
    gates[i] = 1
  else
    gates[i] = 0
    missed = missed + 1
  end
end
if missed > 0 and limited then unreserve({bucket, pause_key}, tonumber(interval_us), missed) end
return {BOOKED, wait, gates}
