-- Take a lost session over: a new owner whose first run comes next (TakeSession).
-- Returns {TAKEN, started_at, deadline_at, due, owner}: due is when the lost run fell due (''
-- when the session predates it), owner the lost run's task id; MOVED when the entry is no longer overdue
-- (not lost after all); GONE when the session is gone (its entry is dropped).
local due = KEYS[1]                -- the due index
local session = KEYS[2]            -- the tracking's session hash
local member = ARGV[1]             -- its due index member
local cutoff = tonumber(ARGV[2])   -- overdue: due at or before this
local owner = ARGV[3]              -- the new owner (the task id of the run to publish)
local now = ARGV[4]                -- the entry's new score
local TAKEN, MOVED, GONE = 1, 0, -1
local score = redis.call('ZSCORE', due, member)
if not score or tonumber(score) > cutoff then return MOVED end
local s = redis.call('HMGET', session, 'started_at', 'deadline_at', 'due', 'owner')
if not s[1] or not s[2] then
  redis.call('ZREM', due, member)
  return GONE
end
redis.call('HSET', session, 'owner', owner, 'run', 0)
redis.call('HINCRBY', session, 'redriven', 1)
redis.call('ZADD', due, now, member)
return {TAKEN, s[1], s[2], s[3] or '', s[4] or ''}
