-- What a finished tracking keeps: one key, its outcome, holding the result JSON, then after
-- a newline the ids of the subscriptions it served (so that a redelivered registration of
-- one of them is not served twice). The outcome's status is what get_status answers from
-- then on.
-- outcome_parts(outcome): the result JSON and the served ids' text.
-- served_ids(tail): that text as a set.
-- forget(outcome_key, subs, claims, session, status): once the outcome is recorded and every
-- callback sent, drops the subscriptions, the claims, the session and the cached status
-- with its history, noting the subscriptions' ids in the outcome.
local function outcome_parts(outcome)
  local cut = string.find(outcome, '\n', 1, true)
  if not cut then return outcome, '' end
  return string.sub(outcome, 1, cut - 1), string.sub(outcome, cut + 1)
end
local function served_ids(tail)
  local served = {}
  for id in string.gmatch(tail, '[^,]+') do served[id] = true end
  return served
end
local function forget(outcome_key, subs, claims, session, status)
  local outcome = redis.call('GET', outcome_key)
  if not outcome then return end
  local ids = redis.call('HKEYS', claims)
  if #ids > 0 then
    local head, tail = outcome_parts(outcome)
    local served = served_ids(tail)
    for _, id in ipairs(ids) do
      if not served[id] then
        tail = (tail == '' and id) or (tail .. ',' .. id)
        served[id] = true
      end
    end
    redis.call('SET', outcome_key, head .. '\n' .. tail, 'KEEPTTL')
  end
  redis.call('DEL', subs, claims, session, status)
end
