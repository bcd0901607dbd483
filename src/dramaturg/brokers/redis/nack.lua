-- Rejects a claimed message into the dead-letter queue, as Dramatiq's nack command does;
-- the same answers as ack.lua.
-- KEYS: claim set, queue bodies, dead letters (zset), their bodies; ARGV: Redis id, now (ms)
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    local body = redis.call("hget", KEYS[2], ARGV[1])
    if body then
        redis.call("zadd", KEYS[3], ARGV[2], ARGV[1])
        redis.call("hset", KEYS[4], ARGV[1], body)
        redis.call("hdel", KEYS[2], ARGV[1])
    end
    return 1
end
if redis.call("hexists", KEYS[2], ARGV[1]) == 1 then
    return 0
end
return -1
