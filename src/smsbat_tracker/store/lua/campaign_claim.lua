-- Claim the due messages of one campaign batch (CampaignRunner.tick's first round trip).
-- A fenced chain notes its batch in its claimed set; a batch it left noted was abandoned
-- (its tick died, and this is the same run again) and is due again first. A run that was
-- taken over claims nothing.
-- Returns {CLAIMED, claimed, cached, checks, failures, pushed}: the claimed ids each
-- followed by its due time, then for each its cached status entry (''), its checks so
-- far, its requests failed in a row and whether a push was seen for it ('1'/'0'): what
-- the rules need, in one round trip. {TAKEN_OVER, {}, {}, {}, {}, {}} for a run taken over.
local due_key = KEYS[1]            -- the campaign's due set, scored by next check time
local checks_key = KEYS[2]         -- per message: checks, 'f:<id>' failures, 'p:<id>' pushed
local claimed_key = KEYS[3]        -- the chain's claimed batch
local meta_key = KEYS[4]           -- the campaign hash (the chains' runs)
local now = ARGV[1]                -- epoch seconds
local limit = ARGV[2]              -- the most messages to claim
local lease_until = ARGV[3]        -- claimed messages are due again then if nobody re-scores
local status_head = ARGV[4]        -- a status key's text before the message id
local status_tail = ARGV[5]        -- and after it
local chain_field = ARGV[6]        -- the chain's field in the campaign hash, '' for no chain
local run = ARGV[7]                -- the chain's run expected (the fencing token)
local CLAIMED, TAKEN_OVER = 1, 0

if chain_field ~= '' then
  if redis.call('HGET', meta_key, chain_field) ~= run then
    return {TAKEN_OVER, {}, {}, {}, {}, {}}
  end
  for _, id in ipairs(redis.call('SMEMBERS', claimed_key)) do
    redis.call('ZADD', due_key, 'XX', now, id)
  end
  redis.call('DEL', claimed_key)
end
local claimed = redis.call(
  'ZRANGEBYSCORE', due_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local ids, cached, checks, failures, pushed = {}, {}, {}, {}, {}
for i = 1, #claimed, 2 do
  local id = claimed[i]
  ids[#ids + 1] = id
  redis.call('ZADD', due_key, 'XX', lease_until, id)
  cached[#cached + 1] = redis.call('GET', status_head .. id .. status_tail) or ''
  local seen = redis.call('HMGET', checks_key, id, 'f:' .. id, 'p:' .. id)
  checks[#checks + 1] = seen[1] or '0'
  failures[#failures + 1] = seen[2] or '0'
  pushed[#pushed + 1] = seen[3] and '1' or '0'
end
if chain_field ~= '' and #ids > 0 then redis.call('SADD', claimed_key, unpack(ids)) end
return {CLAIMED, claimed, cached, checks, failures, pushed}
