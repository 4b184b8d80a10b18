-- reserve(K, A): book rate-limit tokens, oldest request first.
-- KEYS: bucket (theoretical arrival time, in microseconds), pause (when it ends, ms),
-- waiters (scored by when their request fell due, us), waiters' expected return (us).
-- ARGV: emission interval us, burst tolerance us, tokens wanted, how long the caller would
-- wait for them (us), the caller's name ('' for one-off callers), when its request fell
-- due (us; '' for now), how long a waiter may be late to ask again before it is forgotten
-- (us), how far ahead tokens are kept for the waiters in line (us), and optionally '1'
-- when the caller can hold a token booked beyond its own wait (a ticket: it comes back
-- for it), so that the first in line books up to that window ahead instead of racing
-- later callers, who may book within the window, for a token within its own wait.
-- Returns {1, wait}: the tokens are yours from ``wait`` us on; or {0, wait}: nothing was
-- booked, ask again then.
-- Fair: a caller is served only when the tokens of every waiter whose request fell due
-- earlier fit in the line's window too, so the oldest requests go first whoever asks
-- first (a task's retry and a campaign's batch alike), and a turned-away caller is told
-- when its turn comes instead of racing everyone again at the next free token. A caller
-- turned away by a pause takes its place in the line too: when the pause ends, the line
-- goes in order. The window
-- is wider than a caller's own wait, so that waiters who come back late (their worker was
-- busy) hold up the line only when more than the window's worth of them are late. Once
-- tokens have gone unused for half the window (or the bucket has expired), the waiters
-- that were due back by now give up that room: they are not on their way (their worker
-- died or froze), and the line would stand still, every caller turned away, until they
-- were forgotten. Their places are kept elsewhere (a tracking's session, a batch's
-- oldest message) for when they do ask again.
local function reserve(K, A)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local paused = (tonumber(redis.call('GET', K[2])) or 0) * 1000 - now
  local interval = tonumber(A[1])
  local tolerance = tonumber(A[2])
  local n = tonumber(A[3])
  local ahead = tonumber(A[4])
  local member = A[5]
  local due = tonumber(A[6]) or now
  local grace = tonumber(A[7])
  local window = tonumber(A[8])
  local booked_until = redis.call('GET', K[1])
  local tat = tonumber(booked_until or now)
  -- Forgotten: more than the grace late. Idle: the waiters expected back by now, too.
  local forget_before = now
  if not booked_until or tat < now - window / 2 then forget_before = now + grace end
  local gone = redis.call('ZRANGEBYSCORE', K[4], '-inf', string.format('%d', forget_before),
                          'LIMIT', 0, 100)
  if #gone > 0 then
    redis.call('ZREM', K[3], unpack(gone))
    redis.call('ZREM', K[4], unpack(gone))
  end
  if member ~= '' then
    local first = tonumber(redis.call('ZSCORE', K[3], member))
    if first and first < due then due = first end
  end
  local before = redis.call('ZCOUNT', K[3], '-inf', string.format('(%d', due))
  if tat < now then tat = now end
  local line = tat + interval * (before + n) - tolerance - interval - now
  line = line - math.max(window, ahead)
  local reach = ahead
  if A[9] == '1' and member ~= '' and before == 0 then
    reach = math.max(ahead, window)
  end
  local own = tat + interval * n - tolerance - interval - now - reach
  if line > 0 or own > 0 or paused > 0 then
    local retry = math.ceil(math.max(line, own, paused))
    if member ~= '' then
      redis.call('ZADD', K[3], string.format('%d', due), member)
      redis.call('ZADD', K[4], string.format('%d', now + retry + grace), member)
      redis.call('PEXPIRE', K[3], 60000)
      redis.call('PEXPIRE', K[4], 60000)
    end
    return {0, retry}
  end
  local new_tat = tat + interval * n
  local ttl_ms = math.ceil((new_tat - now) / 1000) + 1000
  redis.call('SET', K[1], string.format('%d', new_tat), 'PX', ttl_ms)
  if member ~= '' then
    redis.call('ZREM', K[3], member)
    redis.call('ZREM', K[4], member)
  end
  local wait = new_tat - tolerance - interval - now
  if wait < 0 then wait = 0 end
  return {1, math.ceil(wait)}
end
