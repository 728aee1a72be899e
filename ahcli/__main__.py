from ahcli.app import main

main()
