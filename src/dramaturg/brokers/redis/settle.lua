-- Acknowledges or rejects claimed messages of one worker, as Dramatiq's ack and nack commands
-- do one by one, and answers each: 1 if it was still claimed (and is settled now); else
-- nothing changes (the body is another holder's), and 0 while the body is there (another
-- worker recovered the message while this one was taken for dead: it runs again), -1 once it
-- is gone (settled already: by an earlier try whose reply was lost, or by the worker that
-- ran it again). A rejected message goes into its queue's dead letters.
-- KEYS: namespace; ARGV: worker id, now (ms), then per message: "a" or "n", its queue, its Redis id
local namespace, worker, now = KEYS[1], ARGV[1], ARGV[2]
local answers = {}
for i = 3, #ARGV, 3 do
    local queue, id = ARGV[i + 1], ARGV[i + 2]
    local bodies = namespace .. ":" .. queue .. ".msgs"
    local answer
    if redis.call("srem", namespace .. ":__acks__." .. worker .. "." .. queue, id) == 1 then
        if ARGV[i] == "n" then
            local body = redis.call("hget", bodies, id)
            if body then
                local dead = namespace .. ":" .. string.gsub(queue, "%.DQ$", "") .. ".XQ"
                redis.call("zadd", dead, now, id)
                redis.call("hset", dead .. ".msgs", id, body)
            end
        end
        redis.call("hdel", bodies, id)
        answer = 1
    elseif redis.call("hexists", bodies, id) == 1 then
        answer = 0
    else
        answer = -1
    end
    answers[#answers + 1] = answer
end
return answers
