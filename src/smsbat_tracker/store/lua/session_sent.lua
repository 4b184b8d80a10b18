-- Marks one subscription's dispatch sent (Dispatcher.dispatch). Once every subscription is
-- sent the message leaves the due index, and what it leaves is cut to its outcome
-- (forget, lib/forget.lua).
-- Returns ALL_SENT when that was the last one, else SOME_LEFT.
local claims = KEYS[1]             -- the message's dispatch claims
local subs = KEYS[2]               -- its subscriptions
local due = KEYS[3]                -- the due index
local outcome_key = KEYS[4]        -- the recorded outcome
local session = KEYS[5]            -- the tracking's session
local status = KEYS[6]             -- the cached status
local due_member = ARGV[1]         -- the session's member of the due index
local subscription = ARGV[2]       -- the id of the subscription sent
--! include lib/forget.lua
local SOME_LEFT, ALL_SENT = 0, 1
redis.call('HSET', claims, subscription, 'sent')
local _, tail = outcome_parts(redis.call('GET', outcome_key) or '')
local served = served_ids(tail)
for _, id in ipairs(redis.call('HKEYS', subs)) do
  if redis.call('HGET', claims, id) ~= 'sent' and not served[id] then return SOME_LEFT end
end
redis.call('ZREM', due, due_member)
forget(outcome_key, subs, claims, session, status)
return ALL_SENT
