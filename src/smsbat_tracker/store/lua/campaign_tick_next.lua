-- Move a campaign's tick chain on to its next run, fenced (CampaignRunner.next_run).
-- Returns MOVED, or TAKEN_OVER when the chain's run is no longer the one expected.
local meta_key = KEYS[1]           -- the campaign hash (the chains' runs)
local due_index = KEYS[2]          -- the due index the re-driver reads
local chain_field = ARGV[1]        -- the chain's field in the campaign hash
local run = ARGV[2]                -- the run expected
local next_run = ARGV[3]
local member = ARGV[4]             -- the chain's member in the due index
local next_due = ARGV[5]           -- when the next run is due, epoch seconds
local MOVED, TAKEN_OVER = 1, 0

if redis.call('HGET', meta_key, chain_field) ~= run then return TAKEN_OVER end
redis.call('HSET', meta_key, chain_field, next_run)
redis.call('ZADD', due_index, next_due, member)
return MOVED
