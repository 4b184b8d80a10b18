-- Take a lost campaign tick chain over with a new run (TakeChain). The batch the lost
-- tick had claimed is put back by redrive_release_batch.lua, a bounded part at a time.
-- Returns TAKEN; MOVED when the entry is no longer overdue (not lost after all); GONE
-- when the campaign is gone (its entry is dropped).
local due = KEYS[1]                -- the due index
local meta = KEYS[2]               -- the campaign's hash
local member = ARGV[1]             -- the chain's due index member
local cutoff = tonumber(ARGV[2])   -- overdue: due at or before this
local field = ARGV[3]              -- the chain's field in the campaign hash ('tick:<slot>')
local run = ARGV[4]                -- the new run
local now = ARGV[5]                -- the entry's new score
local TAKEN, MOVED, GONE = 1, 0, -1
local score = redis.call('ZSCORE', due, member)
if not score or tonumber(score) > cutoff then return MOVED end
if redis.call('EXISTS', meta) == 0 then
  redis.call('ZREM', due, member)
  return GONE
end
redis.call('HSET', meta, field, run)
redis.call('HINCRBY', meta, 'redriven', 1)
redis.call('ZADD', due, now, member)
return TAKEN
