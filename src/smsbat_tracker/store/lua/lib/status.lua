-- store(K, A): cache a status unless the cached one is final or newer.
-- K[1]: the status key.
-- A[1] body JSON, A[2] final ('1'/'0'), A[3] the status's time (ts or observed_at),
-- A[4] in-flight TTL ms, A[5] final TTL ms, A[6] observed_at, A[7] source ('poll'/'push'),
-- A[8] the provider's ts or '', A[9] history length, A[10] deliverystatus
-- (StatusCache.store_args builds A, in this order).
-- Returns 1 when stored, 0 when the cached entry is final or newer. The entry is built by
-- concatenation so the provider's body is stored byte for byte (cjson would turn [] into {}).
local function store(K, A)
  local old = redis.call('GET', K[1])
  local new_final = A[2] == '1'
  local history = {}
  local last_status = nil
  if old then
    local ok, e = pcall(cjson.decode, old)
    if ok and type(e) == 'table' then
      if e['f'] == 1 then return 0 end
      local old_time = tonumber(e['ts']) or tonumber(e['o']) or 0
      if (not new_final) and old_time > tonumber(A[3]) then return 0 end
      if type(e['h']) == 'table' then history = e['h'] end
      if type(e['b']) == 'table' then last_status = e['b']['deliverystatus'] end
    end
  end
  if last_status ~= A[10] then
    history[#history + 1] = {A[10], tonumber(A[6]), A[7]}
    while #history > tonumber(A[9]) do table.remove(history, 1) end
  end
  local ts = A[8] == '' and 'null' or A[8]
  local entry = '{"b":' .. A[1] .. ',"o":' .. A[6] .. ',"s":"' .. A[7] .. '","ts":' .. ts
    .. ',"f":' .. (new_final and '1' or '0') .. ',"h":' .. cjson.encode(history) .. '}'
  redis.call('SET', K[1], entry, 'PX', new_final and A[5] or A[4])
  return 1
end
