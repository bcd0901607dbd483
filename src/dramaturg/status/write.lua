-- Write task records, each only over an older one (the status store's flush).
-- A record is "<when, 17 characters>|<JSON>", self-contained, so it is replaced whole,
-- and only by newer news: a sender's late flush never overwrites a worker's later change.
-- KEYS: the record keys. ARGV: the ttl in ms, then one record per key.
local ttl = ARGV[1]
for k = 1, #KEYS do
  local record = ARGV[k + 1]
  local current = redis.call('GET', KEYS[k])
  if (not current) or string.sub(current, 1, 17) <= string.sub(record, 1, 17) then
    redis.call('SET', KEYS[k], record, 'PX', ttl)
  end
end
return #KEYS
