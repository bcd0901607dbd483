-- Drops a queue's dead-lettered messages older than the cutoff (Dramatiq's maintenance did).
-- KEYS: <queue>.XQ, <queue>.XQ.msgs; ARGV: cutoff (ms), at most how many
local ids = redis.call("zrangebyscore", KEYS[1], 0, ARGV[1], "LIMIT", 0, ARGV[2])
if #ids > 0 then
    redis.call("zrem", KEYS[1], unpack(ids))
    redis.call("hdel", KEYS[2], unpack(ids))
end
return #ids
