-- Release the sweep lock if this worker still holds it (Unlock).
-- Returns RELEASED, or NOT_HELD when the lock expired or another worker holds it.
local lock = KEYS[1]               -- the sweep lock
local holder = ARGV[1]             -- this worker's re-driver id
local RELEASED, NOT_HELD = 1, 0
if redis.call('GET', lock) == holder then
  redis.call('DEL', lock)
  return RELEASED
end
return NOT_HELD
