# Stand-in for the official redis:7.0 (Debian's redis-server 7.0 on bookworm): the
# official entrypoint's behaviour that the compose files rely on (runs as user redis,
# protected mode off when no config file is given, "-..." arguments go to redis-server),
# WORKDIR and VOLUME /data, port 6379, CMD redis-server.
FROM roomcast-standin/bookworm
RUN mkdir -p /data && chown redis:redis /data
COPY redis-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
VOLUME /data
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["redis-server"]
