-- put_back(due_key, claimed_key, now, limit): a tick chain's claimed batch back in its
-- campaign's due set, each message at the time it fell due (the claimed set's score: its
-- place in the rate limit's line), at most `limit` messages (-1: all). A message no longer
-- in the due set (finished meanwhile) stays out. A plain set, as an older version noted
-- it, has no due times: its messages are due `now`. Returns how many are left claimed.
local function put_back(due_key, claimed_key, now, limit)
  local kind = redis.call('TYPE', claimed_key)['ok']
  if kind == 'zset' then
    local back
    if limit < 0 then
      back = redis.call('ZRANGE', claimed_key, 0, -1, 'WITHSCORES')
      redis.call('DEL', claimed_key)
    else
      back = redis.call('ZPOPMIN', claimed_key, limit)
    end
    for i = 1, #back, 2 do
      redis.call('ZADD', due_key, 'XX', back[i + 1], back[i])
    end
    return redis.call('ZCARD', claimed_key)
  end
  if kind == 'set' then
    local ids
    if limit < 0 then
      ids = redis.call('SMEMBERS', claimed_key)
      redis.call('DEL', claimed_key)
    else
      ids = redis.call('SPOP', claimed_key, limit)
    end
    for _, id in ipairs(ids) do
      redis.call('ZADD', due_key, 'XX', now, id)
    end
    return redis.call('SCARD', claimed_key)
  end
  return 0
end
