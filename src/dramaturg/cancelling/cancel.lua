-- Cancel requests (see dramaturg/cancelling/requests.py).
--
-- KEYS[1]: the prefix of request keys, "<namespace>:__cancel__:"; KEYS[2]: the feed,
--   "<namespace>:__cancels__", a stream every worker process reads on from the entry it
--   read last (a stream's entry ids only grow, even if the server's clock steps back, so
--   a reader never misses an entry nor reads one twice).
-- ARGV: the ttl in ms, the request (JSON: who asked, when), then the message ids.
-- Returns, per id, 1 for a new request, 0 when one was there already (the first stands:
-- who asked first and when is what the status says).
--
-- A request is set only where there is none (SET NX: a compare-and-set), and the new ones
-- go into the feed, as one entry (fields "0", "1", ...), in the same atomic step: a
-- worker that read the feed after this script ran knows of every request it made.
-- Entries older than the ttl leave the feed here.
local ttl = tonumber(ARGV[1])
local out, fields = {}, {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('SET', KEYS[1] .. id, ARGV[2], 'NX', 'PX', ttl) then
    fields[#fields + 1] = tostring(#fields / 2)
    fields[#fields + 1] = id
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if #fields > 0 then
  redis.call('XADD', KEYS[2], '*', unpack(fields))
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('XTRIM', KEYS[2], 'MINID', now - ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return out
