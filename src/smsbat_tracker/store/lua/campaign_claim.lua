-- Claim the due messages of one campaign batch (CampaignRunner.tick's first round trip).
-- A fenced chain notes its batch in its claimed set, each message scored by when it fell
-- due; a batch it left noted was abandoned (its tick died, and this is the same run again)
-- and is due again first, each message at its own due time: its place in the rate limit's
-- line, before what fell due since. A run that was taken over claims nothing.
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
--! include lib/put_back.lua

if chain_field ~= '' then
  if redis.call('HGET', meta_key, chain_field) ~= run then
    return {TAKEN_OVER, {}, {}, {}, {}, {}}
  end
  put_back(due_key, claimed_key, now, -1)
end
local claimed = redis.call(
  'ZRANGEBYSCORE', due_key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
local cached, checks, failures, pushed = {}, {}, {}, {}
for i = 1, #claimed, 2 do
  local id = claimed[i]
  redis.call('ZADD', due_key, 'XX', lease_until, id)
  cached[#cached + 1] = redis.call('GET', status_head .. id .. status_tail) or ''
  local seen = redis.call('HMGET', checks_key, id, 'f:' .. id, 'p:' .. id)
  checks[#checks + 1] = seen[1] or '0'
  failures[#failures + 1] = seen[2] or '0'
  pushed[#pushed + 1] = seen[3] and '1' or '0'
end
if chain_field ~= '' then
  -- Noted with their due times, a thousand a call (unpack's stack is bounded).
  local noted = {}
  for i = 1, #claimed, 2 do
    noted[#noted + 1] = claimed[i + 1]
    noted[#noted + 1] = claimed[i]
    if #noted == 2000 or i + 1 == #claimed then
      redis.call('ZADD', claimed_key, unpack(noted))
      noted = {}
    end
  end
end
return {CLAIMED, claimed, cached, checks, failures, pushed}
