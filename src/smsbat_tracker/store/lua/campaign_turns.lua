-- A campaign batch's turn (CampaignRunner's batch check): tokens for the whole batch in the
-- rate limit's line, or the batch goes back in the due set as it was; then each message's
-- gate, the per-message minimum interval shared with the tracking's turn. A message
-- checked by someone else within the interval gives its token back.
-- A tick chain first in line books its batch's tokens up to the line's window ahead, as a
-- tracking does (lib/reserve.lua), and holds them as the chain's ticket instead of
-- sleeping on its worker: the batch goes back in the due set and the chain's next tick,
-- back when the tokens come due, takes them. Without this, trackings behind the batch
-- kept the tokens booked further ahead than a batch may wait, and the campaign's first
-- checks waited until the trackings thinned out.
-- Returns {BOOKED, wait_us, gates}: the tokens are the batch's from wait_us on, gates[i]
-- 1 when message i's gate was taken (0: checked just now by someone else); or
-- {DEFERRED, wait_us, {}}: nothing booked for this batch, its turn comes in wait_us.
local bucket = KEYS[1]             -- the rate limit's keys (RateLimiter.keys), then
local pause_key = KEYS[2]
local waiters = KEYS[3]
local waiters_back = KEYS[4]
local due_key = KEYS[5]            -- the campaign's due set
local ticket_key = KEYS[6]         -- the chain's ticket: "<us the last token is due>:<n>"
local GATES_AT = 7                 -- KEYS[GATES_AT + i - 1]: message i's gate
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
local holds = ARGV[11] == '1'      -- the caller is a chain, which can hold a ticket
local ticket_grace_us = tonumber(ARGV[12])  -- how late a chain may come for its ticket
local count = tonumber(ARGV[13])   -- how many messages
local MESSAGES_AT = 14             -- ARGV[MESSAGES_AT + 2 * (i - 1)]: message i's id, then
                                   -- its due time (the score it goes back with)
local BOOKED, DEFERRED = 1, 0
--! include lib/reserve.lua
--! include lib/adjust.lua
--! include lib/gate.lua

local function put_back()
  for i = 1, count do
    local at = MESSAGES_AT + 2 * (i - 1)
    redis.call('ZADD', due_key, 'XX', ARGV[at + 1], ARGV[at])
  end
end

local wait = 0
if limited then
  local n = tonumber(tokens)
  local ahead = tonumber(ahead_us)
  local ticket = holds and redis.call('GET', ticket_key)
  local last, held
  if ticket then
    last, held = string.match(ticket, '^(%d+):(%d+)$')
    last, held = tonumber(last), tonumber(held)
  end
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if last and now > last + ticket_grace_us then last = nil end  -- came too late for it
  if last and held < n then
    -- The batch outgrew its ticket (rare: the claim's size is fixed): the tokens go back,
    -- and it asks anew.
    unreserve({bucket, pause_key}, tonumber(interval_us), held)
    last = nil
  end
  if last and last - now > ahead then
    put_back()
    return {DEFERRED, last - now - ahead, {}}
  end
  if last then
    redis.call('DEL', ticket_key)
    if held > n then unreserve({bucket, pause_key}, tonumber(interval_us), held - n) end
    -- The tokens are due from last - (held - 1) intervals on; a chain that comes late
    -- still sends its requests at the limit's pace.
    wait = math.max(last - now, tonumber(interval_us) * (n - 1))
  else
    if ticket then redis.call('DEL', ticket_key) end
    local turn = reserve({bucket, pause_key, waiters, waiters_back}, {
      interval_us, tolerance_us, tokens, ahead_us, waiter, due_us, grace_us, window_us,
      holds and '1' or '',
    })
    wait = turn[2]
    if turn[1] == 0 then
      put_back()
      return {DEFERRED, wait, {}}
    end
    if wait > ahead then
      -- Booked beyond the batch's own wait (first in line): the chain's next tick takes it.
      redis.call('SET', ticket_key, string.format('%d:%d', now + wait, n),
                 'PX', math.ceil((wait + ticket_grace_us) / 1000) + 1000)
      put_back()
      return {DEFERRED, wait - ahead, {}}
    end
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
