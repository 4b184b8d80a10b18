-- A campaign batch's after-step in one round trip (CampaignRunner's record): cache the
-- answers, re-score and count, note the messages found pushed, pause every caller after
-- a 429, record each outcome once (noted as unsent until its callback is confirmed), and
-- forget the chain's claimed batch (unless the run was taken over: the noted batch is
-- then the new run's).
-- Returns {recorded, left, head, paused}: the ids this call recorded, how many messages
-- are left in the due set, the first one's due time ('' when none), and 1 when it paused
-- every caller (0 when not asked to, or a pause began too recently).
local checks_key = KEYS[1]         -- per message: checks, 'f:<id>' failures, 'p:<id>' pushed
local due_key = KEYS[2]            -- the campaign's due set
local outcomes_key = KEYS[3]       -- per message: its compact outcome record
local meta_key = KEYS[4]           -- the campaign hash (done, 'n:<outcome>', the chains)
local unsent_key = KEYS[5]         -- per message: when its callback was taken (ms)
local pause_key = KEYS[6]          -- the rate limit's pause
local claimed_key = KEYS[7]        -- the chain's claimed batch
local STATUS_KEYS_AT = 8           -- KEYS[STATUS_KEYS_AT + i - 1]: answer i's status key
local final_ttl_ms = ARGV[1]       -- the outcomes hash lives this long
local stamp = ARGV[2]              -- now, ms: the unsent mark ('' when nobody wants callbacks)
local pause_ms = ARGV[3]           -- pause every caller this long ('' for no pause)
local chain_field = ARGV[4]        -- the chain's field in the campaign hash ('' for none)
local run = ARGV[5]                -- the chain's run expected
local store_argc = tonumber(ARGV[6]) -- how many ARGV entries one store(K, A) takes
local stores = tonumber(ARGV[7])   -- answers to cache: store_argc entries each
local rescored = tonumber(ARGV[8]) -- (id, next check time) pairs
local counted = tonumber(ARGV[9])  -- ids answered: one more check, no failures in a row
local failed = tonumber(ARGV[10])  -- ids whose request failed: one more failure in a row
local pushed = tonumber(ARGV[11])  -- ids found pushed: trusted to be pushed from now on
local finals = tonumber(ARGV[12])  -- (id, outcome, record) triples
local LISTS_AT = 13                -- the lists above start here, in that order
--! include lib/status.lua
--! include lib/adjust.lua

local at = LISTS_AT
for i = 1, stores do
  local A = {}
  for j = 1, store_argc do A[j] = ARGV[at + j - 1] end
  store({KEYS[STATUS_KEYS_AT + i - 1]}, A)
  at = at + store_argc
end
for _ = 1, rescored do
  redis.call('ZADD', due_key, 'XX', ARGV[at + 1], ARGV[at])
  at = at + 2
end
for _ = 1, counted do
  redis.call('HINCRBY', checks_key, ARGV[at], 1)
  redis.call('HDEL', checks_key, 'f:' .. ARGV[at])
  at = at + 1
end
for _ = 1, failed do
  redis.call('HINCRBY', checks_key, 'f:' .. ARGV[at], 1)
  at = at + 1
end
for _ = 1, pushed do
  redis.call('HSET', checks_key, 'p:' .. ARGV[at], 1)
  at = at + 1
end
local paused = 0
-- pause() reads only the pause key (K[2]).
if pause_ms ~= '' then paused = pause({'', pause_key}, tonumber(pause_ms)) end
local recorded = {}
for _ = 1, finals do
  local id, outcome, record = ARGV[at], ARGV[at + 1], ARGV[at + 2]
  if redis.call('HSETNX', outcomes_key, id, record) == 1 then
    redis.call('ZREM', due_key, id)
    redis.call('HDEL', checks_key, id, 'f:' .. id, 'p:' .. id)
    redis.call('HINCRBY', meta_key, 'done', 1)
    redis.call('HINCRBY', meta_key, 'n:' .. outcome, 1)
    if stamp ~= '' then redis.call('HSET', unsent_key, id, stamp) end
    recorded[#recorded + 1] = id
  end
  at = at + 3
end
if finals > 0 then redis.call('PEXPIRE', outcomes_key, final_ttl_ms) end
if chain_field ~= '' and redis.call('HGET', meta_key, chain_field) == run then
  redis.call('DEL', claimed_key)
end
local head = redis.call('ZRANGE', due_key, 0, 0, 'WITHSCORES')
return {recorded, redis.call('ZCARD', due_key), head[2] or '', paused}
