-- The first of a check's two round trips (Checks.start): everything a run needs before it
-- decides. The session (opened here when the task was sent by name), the recorded outcome
-- and the cached status; and, for the run the session expects while nothing is recorded,
-- a turn to ask the API (take_turn, lib/turn.lua), in the rate limit's line, taken ahead of
-- the decision. A run that does not ask gives it back in its second round trip.
-- Returns {the session's fields, the outcome's result JSON or '', the cached status or '',
-- the turn: {TURN_NONE, 0} when none was taken for it, else take_turn's reply, 1 when this
-- is the tracking's first run to start (once per session: not a re-drive, nor a copy of
-- the first run given back) else 0}.
local session = KEYS[1]            -- the tracking's session
local outcome_key = KEYS[2]        -- the recorded outcome
local status = KEYS[3]             -- the cached status
local due = KEYS[4]                -- the due index
local gate = KEYS[5]               -- the message's gate
local bucket = KEYS[6]             -- the rate limit's keys (RateLimiter.keys)
local pause_key = KEYS[7]
local waiters = KEYS[8]
local waiters_back = KEYS[9]
local owner = ARGV[1]              -- the run's task id
local started_at = ARGV[2]         -- the session to open when there is none
local deadline_at = ARGV[3]
local session_ttl_ms = ARGV[4]
local due_score = ARGV[5]
local due_member = ARGV[6]         -- the session's member of the due index
local run = ARGV[7]                -- the run's number (Celery's retries)
local gate_ms = ARGV[8]            -- the minimum interval between two checks
local limit_on = ARGV[9] == '1'    -- the rate limit is on
local interval_us = ARGV[10]       -- the rate limit's arguments (RateLimiter.script_args)
local tolerance_us = ARGV[11]
local tokens = ARGV[12]
local ahead_us = ARGV[13]
local waiter = ARGV[14]
local due_us = ARGV[15]            -- when the run fell due (us), its place in the line
local grace_us = ARGV[16]
local window_us = ARGV[17]
local ticket_grace_us = tonumber(ARGV[18])  -- how late a run may come for its ticket
--! include lib/session.lua
--! include lib/turn.lua
local TURN_NONE = 3
local fields = open_session(session, due, owner, started_at, deadline_at, session_ttl_ms,
                            due_score, due_member)
-- The result alone: what follows its first line is bookkeeping (lib/forget.lua).
local outcome = string.match(redis.call('GET', outcome_key) or '', '^[^\n]*')
local cached = redis.call('GET', status) or ''
local turn = {TURN_NONE, 0}
local first = 0
local expected = (not fields[SESSION_RUN]) or tonumber(fields[SESSION_RUN]) == tonumber(run)
local mine = fields[SESSION_OWNER] == owner and expected
-- Counted started even when a push ended it already: the receiver counts that outcome.
if mine and tonumber(run) == 0 then first = redis.call('HSETNX', session, 'begun', 1) end
if outcome == '' and mine then
  -- A check the rate limit turned away keeps its place in the line (when it first fell
  -- due) through its next runs, even when the line forgot it (its worker died or froze,
  -- and the run came back late): the session remembers it until the check is made.
  local line = tonumber(redis.call('HGET', session, 'line'))
  if line and (tonumber(due_us) or math.huge) > line then due_us = string.format('%d', line) end
  -- A token booked for an earlier run of this check, beyond that run's wait (a ticket):
  -- this run takes it when it is due within its own wait, and comes back for it otherwise;
  -- a run too late for it (its worker died or froze meanwhile) asks as any other.
  local ticket = tonumber(redis.call('HGET', session, 'ticket'))
  local t = redis.call('TIME')
  local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  if ticket and now_us > ticket + ticket_grace_us then
    redis.call('HDEL', session, 'ticket')
    ticket = nil
  end
  if ticket and ticket - now_us > tonumber(ahead_us) then
    turn = {TURN_RATE, ticket - now_us - tonumber(ahead_us)}
  elseif ticket then
    redis.call('HDEL', session, 'ticket')
    redis.call('SET', gate, 1, 'PX', gate_ms)  -- the interval runs from this check
    turn = {TURN_TAKEN, math.max(0, ticket - now_us)}
  else
    turn = take_turn(gate, gate_ms, limit_on, {bucket, pause_key, waiters, waiters_back}, {
      interval_us, tolerance_us, tokens, ahead_us, waiter, due_us, grace_us, window_us, '1',
    })
    if turn[1] == TURN_TAKEN and turn[2] > tonumber(ahead_us) then
      -- Booked beyond this run's wait (first in line): the next run takes it.
      redis.call('HSET', session, 'ticket', string.format('%d', now_us + turn[2]))
      turn = {TURN_RATE, turn[2] - tonumber(ahead_us)}
    end
    if turn[1] == TURN_RATE and tonumber(due_us) then
      redis.call('HSETNX', session, 'line', due_us)
    end
  end
end
return {fields, outcome, cached, turn, first}
