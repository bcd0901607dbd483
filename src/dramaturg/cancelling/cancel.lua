-- Cancel requests (see dramaturg/cancelling/requests.py).
--
-- KEYS[1]: the prefix of request keys, "<namespace>:__cancel__:"; KEYS[2]: the feed,
--   "<namespace>:__cancels__", a sorted set of message ids by when they were asked for
--   (this server's clock, ms), which every worker process reads from where it last read.
-- ARGV: the ttl in ms, the request ("<when ms>|<who>" JSON-free text: see requests.py),
--   then the message ids.
-- Returns, per id, 1 for a new request, 0 when one was there already (the first stands:
-- who asked first and when is what the status says).
--
-- A request is set only where there is none (SET NX: a compare-and-set), and the feed
-- gets the id in the same atomic step, so a worker that read the feed after this script
-- ran knows of every request it made. Entries older than the ttl leave the feed here.
local ttl = tonumber(ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {}
for i = 3, #ARGV do
  local id = ARGV[i]
  if redis.call('SET', KEYS[1] .. id, ARGV[2], 'NX', 'PX', ttl) then
    redis.call('ZADD', KEYS[2], now, id)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - ttl))
redis.call('PEXPIRE', KEYS[2], ttl)
return out
