-- open_session(session, due, owner, started_at, deadline_at, ttl_ms, due_score, due_member):
-- opens a tracking's session unless one exists (the registration, and the before-check of
-- a task sent by name). A new session's owner runs next, as run 0, and the due index
-- learns when (due_score) under due_member; the session keeps it too ('due': a re-driven
-- run keeps its place in the rate limit's line).
-- Returns the session's SESSION_FIELDS, in order (store/session_scripts.py's
-- SESSION_FIELDS: a test checks that they agree); SESSION_OWNER and SESSION_RUN are the
-- places of the fencing token's two halves in them.
local SESSION_FIELDS = {
  'owner', 'started_at', 'deadline_at', 'checks', 'polls', 'pushed', 'run', 'failures',
  'why:in_flight', 'why:no_turn', 'why:request_failed', 'why:awaiting_push',
}
local SESSION_OWNER, SESSION_RUN = 1, 7
local function open_session(session, due, owner, started_at, deadline_at, ttl_ms, due_score,
                            due_member)
  if redis.call('HSETNX', session, 'owner', owner) == 1 then
    redis.call('HSET', session, 'run', 0, 'started_at', started_at, 'deadline_at', deadline_at,
               'checks', 0, 'polls', 0, 'due', due_score)
    redis.call('PEXPIRE', session, ttl_ms)
    redis.call('ZADD', due, due_score, due_member)
  end
  return redis.call('HMGET', session, unpack(SESSION_FIELDS))
end
