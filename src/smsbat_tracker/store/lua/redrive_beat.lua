-- One worker's heartbeat (Beat): its wall-clock beat in the holders set, and, when its
-- re-driver's connections carry its name, its beat on this server's clock in the beats
-- set (what the fast path of DeadWorkers compares, with no clock but the server's).
-- Returns {its previous holders score or '' when it had none, the server's time}: a score
-- of 0 means another worker found it gone and gave back what it held (Gone).
local holders = KEYS[1]            -- holder -> its last beat (the worker's wall clock)
local beats = KEYS[2]              -- holder -> its last beat (the server's clock)
local holder = ARGV[1]             -- this worker's re-driver id
local now = ARGV[2]                -- the beat's start, the worker's wall clock
local named = ARGV[3] == '1'       -- its connections carry its name (CLIENT SETNAME)
local previous = redis.call('ZSCORE', holders, holder)
redis.call('ZADD', holders, now, holder)
local t = redis.call('TIME')
local served = tonumber(t[1]) + tonumber(t[2]) / 1e6
if named then
  redis.call('ZADD', beats, served, holder)
else
  redis.call('ZREM', beats, holder)
end
return {previous or '', tostring(served)}
