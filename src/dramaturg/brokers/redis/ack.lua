-- Acknowledges a claimed message, as Dramatiq's ack command does, and says whether it was
-- still claimed: 1 if so; else nothing changes (the body is another holder's), and it
-- returns 0 while the body is there (another worker recovered the message while this one
-- was taken for dead: it runs again), -1 once it is gone (acknowledged already: by an
-- earlier try of this one whose reply was lost, or by the worker that ran it again).
-- KEYS: claim set, queue bodies; ARGV: Redis id
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    redis.call("hdel", KEYS[2], ARGV[1])
    return 1
end
if redis.call("hexists", KEYS[2], ARGV[1]) == 1 then
    return 0
end
return -1
