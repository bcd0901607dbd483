-- Drop from the index the workers whose record expired, and only those: a worker that
-- wrote its record again since the reader looked stays listed.
-- KEYS: the index (a set of worker ids), the records' key prefix. ARGV: worker ids.
local gone = 0
for _, id in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[2] .. id) == 0 then
    gone = gone + redis.call('SREM', KEYS[1], id)
  end
end
return gone
