-- Mark alive the due entries of the tracker tasks a live worker holds (RefreshHeld).
-- An entry is refreshed (scored now) only when it is overdue and its tracking's token
-- still matches the held task's: a stale copy of a taken-over run keeps nothing alive.
-- Returns how many entries were refreshed.
local due = KEYS[1]                -- the due index
local now = tonumber(ARGV[1])      -- the refreshed entries' new score
local count = tonumber(ARGV[2])    -- held tasks in this call
-- Each held task i (0-based) has one hash in KEYS and ITEM_ARGS entries in ARGV:
--   KEYS[FIRST_KEY + i]              its tracking's hash (the session, or the campaign's)
--   ARGV[FIRST_ARG + i * ITEM_ARGS]  its due index member, then the hash field that holds
--                                    its token ('owner' or 'tick:<slot>'), the token it
--                                    carries, and the run it carries ('' for a chain)
local FIRST_KEY, FIRST_ARG, ITEM_ARGS = 2, 3, 4
local refreshed = 0
for i = 0, count - 1 do
  local hash = KEYS[FIRST_KEY + i]
  local at = FIRST_ARG + i * ITEM_ARGS
  local member, field, token, run = ARGV[at], ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
  local ok
  if run ~= '' then
    local v = redis.call('HMGET', hash, field, 'run')
    ok = v[1] == token and tonumber(v[2]) == tonumber(run)
  else
    ok = redis.call('HGET', hash, field) == token
  end
  if ok then
    local score = redis.call('ZSCORE', due, member)
    if score and tonumber(score) < now then
      redis.call('ZADD', due, now, member)
      refreshed = refreshed + 1
    end
  end
end
return refreshed
